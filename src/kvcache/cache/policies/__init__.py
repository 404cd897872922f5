"""KV policies, one class a file (`registry.POLICIES`): a policy string parses into selectors and one store."""
