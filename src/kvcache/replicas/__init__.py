"""`kvcache serve --replicas N`: engine replicas on Ray Serve behind one OpenAI-compatible ingress.

routing.py (which replica: prefix affinity over the prefix cache's block hashes, round-robin,
least loaded; no Ray), prompt.py (a request body -> its prompt's block hashes), bridge.py (an
HTTP request run through an ASGI app in-process, as messages), cluster_metrics.py (per replica
and cluster Prometheus text), and the Ray pieces: router.py (the Serve request router),
replica.py (one engine + the single server's app), ingress.py (the HTTP front), loopback.py (a
local Ray instance on 127.0.0.1 only), launch.py (start or join Ray, deploy, wait). Importing this package imports no Ray; only the Ray pieces do.
"""
