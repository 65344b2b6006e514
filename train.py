"""Train, validate, test or predict with any zoo model on any zoo DataModule.

python train.py fit --config configs/quickstart.yaml
python train.py fit --config configs/ptb_char/bn_lstm.yaml --config configs/logger/wandb.yaml
python train.py test --config configs/ptb_char/bn_lstm.yaml --ckpt_path runs/ptb_char/bn_lstm/checkpoints/last.ckpt
python train.py fit --help
"""

from zoo.cli import main
from zoo.runtime import tune_malloc

if __name__ == "__main__":
    tune_malloc()  # the allocator settings the speed benchmark measures with (zoo/runtime.py)
    main()
