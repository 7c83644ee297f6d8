"""The egress stage."""
