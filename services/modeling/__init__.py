"""Model definitions shared by the bundle tools and the services (torch modules, no serving logic)."""
