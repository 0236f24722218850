"""Everything a user can write in a recipe, validated: the schema, the engine section, loading."""
