"""Helpers of the main scripts that are not part of the method: run_dir (train.py's --out_dir)."""
