from lora_train.cli import main

raise SystemExit(main())
