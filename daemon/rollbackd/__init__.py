"""rollbackd: watch a service in Prometheus after each release and roll a bad release back."""

__version__ = "0.1.0"
