from sat_train.cli import main

raise SystemExit(main())
