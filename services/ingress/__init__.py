"""The ingress stage."""
