from rollbackd.cli.main import main

raise SystemExit(main())
