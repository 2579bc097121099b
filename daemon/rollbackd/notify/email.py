"""``email``: a plain-text message over SMTP (standard library).

smtplib blocks, so each message is sent from a worker thread; its socket timeout bounds the
thread, and the dispatcher's per-attempt timeout bounds the wait for it. SMTP answers in the
4xx range are transient by the protocol's own definition and are retried; 5xx are not.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.config.secrets import read_secret
from rollbackd.notify.base import BuildContext, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Message


class EmailNotifier(NotifierSpec):
    type: Literal["email"]
    smtp_host: str
    smtp_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    from_addr: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[str] = Field(min_length=1)

    key_hints: ClassVar[dict[str, str]] = {
        "password": "the password is a secret: set 'password_file' or 'password_env'"
    }

    @model_validator(mode="after")
    def _password_with_username(self) -> Self:
        if self.password_file and self.password_env:
            raise ValueError("set only one of 'password_file' or 'password_env'")
        if self.username and not (self.password_file or self.password_env):
            raise ValueError("'username' needs 'password_file' or 'password_env'")
        return self

    def build(self, context: BuildContext) -> Sender:
        redact = Redactor()
        password: str | None = None
        if self.password_file or self.password_env:
            password = read_secret(
                self.password_file, self.password_env, f"notify {self.name}: SMTP password"
            )
            redact.add(password)
        return EmailSender(self, password, redact, context)


class EmailSender(Sender):
    type = "email"

    def __init__(
        self, spec: EmailNotifier, password: str | None, redact: Redactor, context: BuildContext
    ) -> None:
        super().__init__(spec.name, redact)
        self._spec = spec
        self._password = password
        self._timeout = context.timeout

    async def send(self, message: Message) -> None:
        mail = email_message(message, sender=self._spec.from_addr, to=self._spec.to)
        try:
            await asyncio.to_thread(self._deliver, mail)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            transient = bool(codes) and all(400 <= code < 500 for code in codes)
            refused = ", ".join(f"{r}: {c} {_text(m)}" for r, (c, m) in exc.recipients.items())
            raise self.error("smtp", f"recipients refused: {refused}", retry=transient) from None
        except smtplib.SMTPResponseException as exc:
            # Authentication, sender refused, data refused: the server's own verdict.
            transient = 400 <= exc.smtp_code < 500
            detail = f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}"
            raise self.error("smtp", detail, retry=transient) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise self.error("network", f"server disconnected: {exc}", retry=True) from None
        except smtplib.SMTPException as exc:
            # STARTTLS or AUTH not offered, no recipients left: configuration, not weather.
            raise self.error("smtp", f"{type(exc).__name__}: {exc}", retry=False) from None
        except ssl.SSLError as exc:
            raise self.error("tls", f"TLS failed: {exc}", retry=False) from None
        except TimeoutError as exc:
            raise self.error("timeout", f"no answer in time: {exc}", retry=True) from None
        except OSError as exc:
            raise self.error("connect", f"cannot connect: {exc}", retry=True) from None

    def _deliver(self, mail: EmailMessage) -> None:
        spec = self._spec
        with smtplib.SMTP(spec.smtp_host, spec.smtp_port, timeout=self._timeout) as smtp:
            smtp.ehlo()
            if spec.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if spec.username and self._password is not None:
                smtp.login(spec.username, self._password)
            smtp.send_message(mail)


def email_message(message: Message, *, sender: str, to: list[str]) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = message.title
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail["Date"] = formatdate(message.event.at, usegmt=True)
    mail["Message-ID"] = make_msgid(domain="rollbackd")
    mail["X-Rollbackd-Event"] = message.type
    if message.service:
        mail["X-Rollbackd-Service"] = message.service
    mail.set_content(message.text())
    return mail


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
