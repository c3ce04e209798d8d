"""Kiln's web console: read-only pages over the registry, variants, sweeps, monitoring and
explanations, served at `/ui` by the Serve application and by `kiln ui` on the embedded default.

Every page is a static shell (no data, no key needed) whose script asks for an API key once,
keeps it in sessionStorage and fetches the page's body, rendered on the server by Jinja2, with
`Authorization: Bearer`; the same scopes as the HTTP API decide what a key sees. Charts are
drawn by Chart.js, served from this package (static/vendor/): no CDN, machines may be offline.
"""
