"""The ground floor: errors, files, processes, signals, progress, phase timing and the backend
switch. It imports nothing of the project above it."""
