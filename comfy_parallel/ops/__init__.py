"""Operating the server, beside a prompt's path rather than on it: ``deploy`` (nginx/systemd/script front ends),
``provision`` (ComfyUI checkouts), ``scan`` (custom nodes that pin a device) and ``supervisor``
(``serve --supervise`` starts the server again after a crash).
"""
