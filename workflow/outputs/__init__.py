"""Writers of what hexpr hands to people and other tools: CSV tables, AnnData, QuPath GeoJSON, figures."""
