"""The review station: a Streamlit app over the inspection service (python -m client review)."""
