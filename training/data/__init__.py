"""Battery data: the AI Hub layout reader, labels and battery-level splits."""
