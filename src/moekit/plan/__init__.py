"""Plan MoE runs: parameters, FLOPs, memory, communication, time and energy."""
