from forge_bench.cli import main

raise SystemExit(main())
