"""One `APIRouter` per resource; serving/app.py includes them into the one Serve ingress."""
