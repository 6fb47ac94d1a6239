"""Server-rendered result pages (`/ui/queries`, `/ui/queries/{id}`): HTML from Jinja2 templates
with autoescaping, inline SVG for thumbnails and the score histogram, no JavaScript."""
