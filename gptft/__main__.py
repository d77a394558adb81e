from gptft.cli import main

raise SystemExit(main())
