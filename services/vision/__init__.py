"""Vision agent: looks at the photo and names the defects (VisionService)."""
