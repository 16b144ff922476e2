"""What starts runs: workers that take queued work, schedules, triggers."""
