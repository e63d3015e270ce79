"""Per-connection client identity: the value, its validation, headers and scope.

The plain-Python core (``client_identity``, ``policy``, ``headers``, ``scope``,
``http_clients``) imports nothing from ``realtime``; the model and admin are
the Django side of the same concept.
"""
