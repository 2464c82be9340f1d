"""The HTTP side of a prompt's path: ``multigpu`` wires ComfyUI's entry points, ``routing`` picks the target device
of each request, ``access`` and ``validation`` guard the routes, and ``http_api``/``device_status``/``metrics`` add
the /multigpu/ endpoints, the status page and Prometheus /metrics. An accepted prompt goes on to ``scheduling``.
"""
