"""The Lightning plugin: the callback, the forgetting module and what they are made of; imports no other layer."""
