import os

# torch's OpenMP workers spin while they wait; on a busy CPU that costs many times the work itself
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lora_train.cli import main  # noqa: E402

raise SystemExit(main())
