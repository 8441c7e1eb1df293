"""File downloads both doors answer the same way (the API's export and the pages' link)."""


def markdown_file(conversation, text):
    return text, 200, {"Content-Type": "text/markdown; charset=utf-8",
                       "Content-Disposition": f'attachment; filename="conversation-{conversation.id}.md"'}
