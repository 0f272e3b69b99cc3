from estat_ingest.cli import main

raise SystemExit(main())
