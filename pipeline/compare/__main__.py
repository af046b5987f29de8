from pipeline.compare.cli import main

raise SystemExit(main())
