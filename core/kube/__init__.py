"""Talking to a Kubernetes API server: the connection (kpr.kube.client) and list+watch
informers (kpr.kube.informer). A core facility: the kubernetes source uses it, and plugins
that need the API (announce_arp's Lease membership) ask the core for a client instead of
building their own.
"""
