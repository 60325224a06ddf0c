"""The fleet's HTTP side: one Starlette app on uvicorn, its routes, tokens and the dashboard.

    server.py      HttpServer, build_app, fleet_app: the listener, its limits, the one error-to-status table
    routes.py      api_route (token, body limit, thread pool), static routes for the repository
    auth.py        operator tokens and roles; secrets read from files only their owner reads
    dashboard.py   the dashboard page (static/) and its JSON API
    views.py       read-only views of the fleet (overview, devices, telemetry series, audit)
    metrics.py     Prometheus /metrics
    static/        the dashboard's page, script and styles
"""
