from ctr.cli import main

raise SystemExit(main())
