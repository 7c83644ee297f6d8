"""The gateway: the browser edge's HTTP front (sessions, WHIP/WHEP relay, live events, the web page)."""
