"""Ray runtime, cluster address/auth/storage rules, Ray job submission and the KubeRay RayJob (imports nothing above)."""
