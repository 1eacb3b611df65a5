"""The runtime every stage runs on: the loop (loop.py) and what it is made of -- checkpoints, data and model
parallelism, signals, non-finite guards, trackers, throughput, the run folder. It knows no stage; the stages
(rlhf_time.stages) fill its hooks."""
