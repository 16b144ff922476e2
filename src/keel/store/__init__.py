"""Storage: run metadata through SQLAlchemy Core, values through serializers into an
artifact store addressed by content."""
