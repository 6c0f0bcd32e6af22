"""Language-model policies: chat serving, paper 2's indicators on text, the LM gate, causal-LM releases."""
