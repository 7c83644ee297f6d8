"""The browser media edge's peer side: WebRTC peer connections that live in the replicas owning a session.

The caller's microphone (WHIP) ends in the session's ingress owner, the agent's voice (WHEP) in its
egress owner; the gateway only relays the SDP over the bus (``proto.subjects.SIGNAL``). This package
holds what both stages share: answering offers on the bus, ICE and jitter-buffer settings, and the
outgoing track of the agent's voice.
"""
