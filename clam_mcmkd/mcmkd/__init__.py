"""MCM-KD building blocks: context windows, masks, predictor, teacher cache, losses.

The training loop that ties them together lives in :mod:`clam_mcmkd.finetune`.
"""
