from acrl.launch import main

raise SystemExit(main())
