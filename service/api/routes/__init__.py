"""One APIRouter per resource; `app.create_app` includes them all."""
