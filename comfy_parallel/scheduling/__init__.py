"""From accepted prompt to running worker: ``queues`` holds one queue per device and the shared history (``pool``
for late binding), ``workers`` runs ComfyUI's executor loop in one thread per device, ``worker_context`` keeps the
per-worker state ComfyUI holds in globals, ``device_gate`` keeps CUDA graph captures apart from other GPU work, and
``cuda_fatal`` ends the process when a prompt's error shows a poisoned CUDA context.
"""
