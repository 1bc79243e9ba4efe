"""ScaleKV and its equal-budget baselines: KV-compression policies, budget allocation, ASI calibration."""
