"""Small helpers without a better home: seeding, devices."""
