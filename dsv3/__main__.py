from dsv3.cli import main

raise SystemExit(main())
