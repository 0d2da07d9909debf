from forge_train.cli import main

raise SystemExit(main())
