"""Evaluation: reads predictions and reference labels (Dice, HD95 per label and case), decides
postprocessing on out-of-fold predictions (``WORK/<config>/postprocessing.json``), and writes the model
comparison report (``WORK/report/``) from run folders only.
"""
