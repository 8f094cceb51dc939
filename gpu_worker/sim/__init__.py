"""`plan`: a discrete-event simulation of the worker's real Scheduler and PipelinePlanner on a virtual clock, each
step costed by a roofline model of a host profile (`python -m gpu_worker.probe`) or a preset. No model runs."""
