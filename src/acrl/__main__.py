from acrl.cli import main

raise SystemExit(main())
