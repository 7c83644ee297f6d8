"""The LiveKit media edge: the caller's room track into the ingress, the agent's voice out of the egress.

A session with ``source == "livekit"`` has its ingress owner join the room as a hidden, subscribe-only
participant that hears the caller's microphone; with ``sink == "livekit"`` its egress owner joins as the
agent, publishes the agent's voice, captions both sides and shows the agent's state. Both use the
``livekit`` rtc SDK; tokens are minted here from the API key and secret (livekit-api).
"""
