"""Learning fidelity: the tiny pretrained base (`builtin:tinybase`), the scene scorer and the concept test.

`python -m lora_train.testing build-base | fidelity | score | install-base`.
"""
