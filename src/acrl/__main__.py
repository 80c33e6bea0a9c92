from acrl.app.cli import main

raise SystemExit(main())
