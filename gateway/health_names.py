"""Names the gateway's grpc.health.v1 service answers for (besides "", the whole server).

In a module of their own so that the launcher and probes can name them without importing the gateway.
"""

PUBLIC_SERVICE = "neoserve.v1.InferenceService"  # SERVING while requests can be served (some backend is up)
OFFLOAD_SERVICE = "neoserve.v1.InferenceService.CpuOffload"  # SERVING while KV can go to the sidecar(s)
ALL_BACKENDS_SERVICE = "neoserve.v1.InferenceService.AllBackends"  # SERVING while every known backend takes requests
